"""Attacks on a running TURN server, and a reference call that measures what they do to it.

The **reference call** is two allocations on the server, each a UDP client on 127.0.0.1 whose
peer is the other's relayed address (CreatePermission, then ChannelBind), exchanging
ChannelData at a steady media rate: by default 50 packets a second each way, 200 bytes each,
every packet carrying its sequence number and its send time. Per direction it reports the loss
and the longest gap between packets received. Arrival times are the kernel's receive timestamps
(``SO_TIMESTAMPNS``), so a receiver that is scheduled late does not show as a gap.

Three gaps are reported per direction, all in milliseconds:

* ``max_gap_ms``: the longest time between two consecutive packets received, counted from the
  first packet sent to the last one sent (so a stream that stops before the end shows too);
* ``sender_max_gap_ms``: the longest time between two consecutive sends: the client's own
  pauses (on a busy machine the sender, not the server, may be late);
* ``max_relay_gap_ms``: the longest stretch without an arrival while a packet had been sent and
  not yet received: the gap with the media interval and the sender's own pauses taken out. A
  steady stream shows its one-way latency here (about a millisecond on loopback); a server that
  stalls for 300 ms shows 300 ms here and about 320 ms in ``max_gap_ms``. It is what the
  server is accountable for.

The **attacks**, each bounded in messages (or connections) and in time, each only toward the
server's listeners on 127.0.0.0/8 (:class:`Target` refuses any other address):

* :func:`oversized`: 64 KiB Binding requests carrying ~16,000 distinct unknown
  comprehension-required attribute types, 64 KiB CreatePermission requests carrying ~5,400
  XOR-PEER-ADDRESS attributes, truncated and garbage datagrams, over UDP; the two 64 KiB kinds
  also over one TCP connection (garbage would only close a stream);
* :func:`flood_401`: bare 20-byte Allocate, Refresh, CreatePermission and ChannelBind requests
  (each answered by a 401 challenge), from one source port and spread over many;
* :func:`permission_flood`: one authenticated allocation sending CreatePermission requests that
  carry as many XOR-PEER-ADDRESS attributes as fit in a datagram, every address distinct, from
  198.18.0.0/15 (RFC 2544's benchmarking range: never sent to, only permitted; the server must
  allow it with ``allowed_peers``), halving the count after each refusal;
* :func:`connection_flood`: hundreds of TCP connections to the TCP listener, each sending one
  Binding request, all held open;
* :func:`never_reads`: one TCP connection pipelining Binding requests and never reading.

Each attack is a plain function (sockets and ``selectors``, no event loop) returning a dict of
what it achieved: messages sent and their rate, answers received and their bytes. :func:`run_phase`
runs a set of them, each in its own process (``python -m benchmarks.attack worker``, so the
attackers' CPU use does not delay the reference call's sender through the GIL), and the
reference call in the calling process, all started at the same moment. :func:`run_scenario` runs the whole sequence: a baseline, each attack
alone, all of them at once, and a fresh call afterwards.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import heapq
import hmac
import ipaddress
import json
import os
import random
import select
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

from turnserver.auth import long_term_key
from turnserver.credentials import mint_credentials
from turnserver.stun import (
    MAGIC_COOKIE,
    Attr,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    decode_message,
    encode_message,
)
from turnserver.stun.errors import FramingError, StunDecodeError

from . import procfs

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
# The largest UDP payload over IPv4 (65,535 - 20 - 8) and the largest STUN message length
# (a 16-bit field, a multiple of 4).
MAX_UDP_PAYLOAD = 65507
MAX_STUN_LENGTH = 65532
CHANNEL = 0x4000
# Every blocking wait has a limit.
TRANSACTION_TIMEOUT_S = 1.0
TRANSACTION_ATTEMPTS = 3
READY_TIMEOUT_S = 30.0
JOIN_GRACE_S = 15.0
# Answers read per socket per turn of an attack's loop, and sends per turn: bounds the time a
# single turn can take so that the clock is looked at often.
_DRAIN = 256
_BURST = 256
_TICK_S = 0.002
# Linux's SO_TIMESTAMPNS (SCM_TIMESTAMPNS): the socket module of Python 3.11 has no name for it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("qq")
_HEADER = struct.Struct("!HHI12s")
_MEDIA = struct.Struct("!BId")  # direction, sequence number, send time (Unix seconds)
_LINGER_RESET = struct.pack("ii", 1, 0)

Address = tuple[str, int]
StartHook = Callable[[], None]


class AttackError(RuntimeError):
    """Setting up an attack or the reference call failed (no answer, an error response)."""


@dataclass(frozen=True)
class Target:
    """The server under attack: its listeners on loopback and how to make credentials."""

    udp: Address
    tcp: Address | None
    secret: str
    realm: str
    pid: int | None = None  # read for RSS and CPU time; None: not read

    def __post_init__(self) -> None:
        for address in (self.udp, self.tcp):
            if address is not None and ipaddress.ip_address(address[0]) not in LOOPBACK:
                raise ValueError(f"attacks are only sent to 127.0.0.0/8, not {address[0]}")

    def require_tcp(self) -> Address:
        if self.tcp is None:
            raise AttackError("this attack needs the server's TCP listener")
        return self.tcp


# ------------------------------------------------------------------------------- wire helpers


def _request_type(method: int) -> int:
    """The STUN message type of a request of ``method`` (RFC 8489 §5: class bits are zero)."""
    return (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2)


def _raw_message(msg_type: int, body: bytes, txid: bytes | None = None) -> bytes:
    return _HEADER.pack(msg_type, len(body), MAGIC_COOKIE, txid or os.urandom(12)) + body


def _with_txid(message: bytes, txid: bytes) -> bytes:
    return message[:8] + txid + message[20:]


def unknown_attribute_types(count: int) -> list[int]:
    """``count`` distinct comprehension-required types (0x0030-0x7FFF) the codec does not know."""
    known = {int(a) for a in Attr}
    types = [t for t in range(0x0030, 0x8000) if t not in known]
    if count > len(types):
        raise ValueError(f"only {len(types)} unknown comprehension-required types exist")
    return types[:count]


def unknown_attributes_binding(max_size: int = MAX_UDP_PAYLOAD) -> bytes:
    """A Binding request of up to ``max_size`` bytes made of empty unknown attributes (4 bytes each)."""
    count = min(MAX_STUN_LENGTH, max_size - 20) // 4
    body = b"".join(struct.pack("!HH", t, 0) for t in unknown_attribute_types(count))
    return _raw_message(_request_type(Method.BINDING), body)


def xor_peer_block(ips: list[int], port: int = 0) -> bytes:
    """XOR-PEER-ADDRESS attributes, one per IPv4 address (RFC 8489 §14.2: XORed with the cookie)."""
    head = struct.pack("!HHBBH", Attr.XOR_PEER_ADDRESS, 8, 0, 1, port ^ (MAGIC_COOKIE >> 16))
    return b"".join(head + struct.pack("!I", ip ^ MAGIC_COOKIE) for ip in ips)


def xor_peers_request(max_size: int = MAX_UDP_PAYLOAD, first_ip: str = "198.18.0.0") -> bytes:
    """An unauthenticated CreatePermission request of up to ``max_size`` bytes, all XOR-PEER-ADDRESS."""
    count = min(MAX_STUN_LENGTH, max_size - 20) // 12
    base = int(ipaddress.IPv4Address(first_ip))
    return _raw_message(_request_type(Method.CREATE_PERMISSION), xor_peer_block([base + i for i in range(count)]))


def garbage_datagrams(rng: random.Random, count: int = 64) -> list[bytes]:
    """Truncated, over-long, mis-framed and random datagrams."""
    valid = encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST).add(Attr.REQUESTED_TRANSPORT, 17))
    out: list[bytes] = [valid[:n] for n in range(1, len(valid))]  # every truncation
    out.append(_raw_message(_request_type(Method.BINDING), b"")[:4] + struct.pack("!I", 0xDEADBEEF)
               + os.urandom(12))  # bad magic cookie
    out.append(struct.pack("!HH", 0x0001, 65000) + struct.pack("!I", MAGIC_COOKIE) + os.urandom(112))
    out.append(struct.pack("!HH", 0x0001, 7) + struct.pack("!I", MAGIC_COOKIE) + os.urandom(19))
    # An attribute whose length runs past the end of the message.
    out.append(_raw_message(_request_type(Method.BINDING), struct.pack("!HH", 0x8022, 4000) + b"x" * 8))
    while len(out) < count:
        kind = rng.randrange(3)
        if kind == 0:  # random bytes starting like STUN
            out.append(bytes([rng.randrange(0x40)]) + rng.randbytes(rng.randint(1, 1400)))
        elif kind == 1:  # ChannelData to a channel nobody bound, with a lying length
            out.append(struct.pack("!HH", 0x4000 + rng.randrange(0x1000), rng.randrange(0x10000))
                       + rng.randbytes(rng.randint(0, 1200)))
        else:  # anything at all
            out.append(rng.randbytes(rng.randint(1, 1400)))
    return out


def _message_class(data: bytes) -> str:
    if len(data) < 2:
        return "short"
    msg_type = (data[0] << 8) | data[1]
    cls = ((msg_type >> 7) & 0x2) | ((msg_type >> 4) & 0x1)
    return {0: "request", 1: "indication", 2: "success", 3: "error"}[cls]


def _error_code(data: bytes) -> int | None:
    try:
        msg = decode_message(data)
    except StunDecodeError:
        return None
    code = msg.get(Attr.ERROR_CODE)
    if isinstance(code, tuple):
        return int(code[0])
    return 200 if msg.msg_class == MessageClass.SUCCESS else None


def _loopback_udp(rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        except OSError:
            pass
    sock.bind((HOST, 0))
    return sock


# ------------------------------------------------------------------------------- a TURN client


class TurnClient:
    """A small blocking TURN client over UDP: the 401 dance, permissions, channels, Refresh."""

    def __init__(self, target: Target, user: str, *, rcvbuf: int | None = None) -> None:
        creds = mint_credentials(target.secret, user, 3600)
        self.server = target.udp
        self.username, self.password = creds.username, creds.password
        self.realm = target.realm
        self.nonce: str | None = None
        self.sock = _loopback_udp(rcvbuf)
        self.relayed: Address | None = None

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    def close(self) -> None:
        self.sock.close()

    def auth_attributes(self) -> bytes:
        """USERNAME, REALM and NONCE encoded as attributes (for hand-built signed requests)."""
        assert self.nonce is not None
        msg = Message(Method.BINDING, MessageClass.REQUEST, attributes=[
            (Attr.USERNAME, self.username), (Attr.REALM, self.realm), (Attr.NONCE, self.nonce)])
        return encode_message(msg)[20:]

    def sign(self, method: int, body: bytes, txid: bytes) -> bytes:
        """``body`` (raw attributes) plus USERNAME/REALM/NONCE and MESSAGE-INTEGRITY (RFC 8489 §14.5)."""
        attrs = body + self.auth_attributes()
        header = _HEADER.pack(_request_type(method), len(attrs) + 24, MAGIC_COOKIE, txid)
        mac = hmac.new(self.key, header + attrs, hashlib.sha1).digest()
        return header + attrs + struct.pack("!HH", Attr.MESSAGE_INTEGRITY, 20) + mac

    def transact(self, data: bytes, txid: bytes, *, timeout_s: float = TRANSACTION_TIMEOUT_S,
                 attempts: int = TRANSACTION_ATTEMPTS) -> Message | None:
        """Send, and retransmit, until the response with ``txid`` arrives; None when none did."""
        self.sock.setblocking(True)
        for _ in range(attempts):
            self.sock.sendto(data, self.server)
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    reply = self.sock.recv(65536)
                except (socket.timeout, TimeoutError):
                    break
                if not reply or reply[0] >= 0x40:
                    continue  # media
                try:
                    msg = decode_message(reply)
                except StunDecodeError:
                    continue
                if msg.transaction_id == txid and msg.msg_class in (MessageClass.SUCCESS, MessageClass.ERROR):
                    return msg
        return None

    def request(self, method: int, attrs: list[tuple[int, object]]) -> Message:
        """An authenticated request; a 401 or 438 teaches REALM and NONCE and it is sent again."""
        for _ in range(3):
            msg = Message(method, MessageClass.REQUEST, attributes=list(attrs))
            if self.nonce is not None:
                msg.add(Attr.USERNAME, self.username).add(Attr.REALM, self.realm).add(Attr.NONCE, self.nonce)
                data = encode_message(msg, key=self.key)
            else:
                data = encode_message(msg)
            reply = self.transact(data, msg.transaction_id)
            if reply is None:
                raise AttackError(f"no answer to {Method(method).name} from {self.server}")
            code = reply.get(Attr.ERROR_CODE)
            status = code[0] if isinstance(code, tuple) else 200
            if status in (401, 438) and reply.get(Attr.NONCE) is not None and \
                    (self.nonce is None or status == 438):
                self.nonce = str(reply.get(Attr.NONCE))
                self.realm = str(reply.get(Attr.REALM) or self.realm)
                continue
            return reply
        return reply

    def _ok(self, reply: Message, what: str) -> Message:
        if reply.msg_class != MessageClass.SUCCESS:
            raise AttackError(f"{what} refused: {reply.get(Attr.ERROR_CODE)}")
        return reply

    def allocate(self, lifetime_s: int | None = None) -> Address:
        attrs: list[tuple[int, object]] = [(Attr.REQUESTED_TRANSPORT, 17)]
        if lifetime_s is not None:
            attrs.append((Attr.LIFETIME, lifetime_s))
        reply = self._ok(self.request(Method.ALLOCATE, attrs), "Allocate")
        relayed = reply.get(Attr.XOR_RELAYED_ADDRESS)
        assert isinstance(relayed, tuple)
        self.relayed = (str(relayed[0]), int(relayed[1]))
        return self.relayed

    def permit(self, *peers: Address) -> None:
        self._ok(self.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, p) for p in peers]),
                 "CreatePermission")

    def bind(self, number: int, peer: Address) -> None:
        self._ok(self.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)]),
                 "ChannelBind")

    def release(self) -> bool:
        """Refresh with LIFETIME 0 (RFC 8656 §7.3); best effort, True when the server confirmed."""
        try:
            self.sock.setblocking(True)
            msg = Message(Method.REFRESH, MessageClass.REQUEST, attributes=[(Attr.LIFETIME, 0)])
            msg.add(Attr.USERNAME, self.username).add(Attr.REALM, self.realm).add(Attr.NONCE, self.nonce)
            reply = self.transact(encode_message(msg, key=self.key), msg.transaction_id,
                                  timeout_s=0.3, attempts=2)
        except (OSError, AttackError):
            return False
        return reply is not None and reply.msg_class == MessageClass.SUCCESS


def binding_ms(address: Address, *, transport: str = "udp", timeout_s: float = 3.0) -> float | None:
    """One Binding request to ``address`` (retransmitted over UDP): its round trip, or None."""
    if ipaddress.ip_address(address[0]) not in LOOPBACK:
        raise ValueError("only loopback")
    msg = Message(Method.BINDING, MessageClass.REQUEST)
    data = encode_message(msg)
    started = time.monotonic()
    deadline = started + timeout_s
    if transport == "tcp":
        try:
            with socket.create_connection(address, timeout=timeout_s) as sock:
                sock.sendall(data)
                framer = StreamFramer()
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    chunk = sock.recv(4096)
                    if not chunk:
                        return None
                    for frame in framer.feed(chunk):
                        if frame[8:20] == msg.transaction_id:
                            return round(1000 * (time.monotonic() - started), 2)
        except (OSError, FramingError):
            return None
        return None
    with _loopback_udp() as sock:
        while (left := deadline - time.monotonic()) > 0:
            try:
                sock.sendto(data, address)
                sock.settimeout(min(0.5, left))
                reply = sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return None
            if reply[8:20] == msg.transaction_id and _message_class(reply) == "success":
                return round(1000 * (time.monotonic() - started), 2)
    return None


# ------------------------------------------------------------------------------- pacing


class Pacer:
    """Sends at ``rate`` per second, at most ``max_count`` in all; ``due`` says how many now."""

    def __init__(self, rate: float, max_count: int, started: float) -> None:
        self.rate = max(0.0, rate)
        self.max_count = max(0, int(max_count))
        self.started = started
        self.sent = 0

    @property
    def exhausted(self) -> bool:
        return self.sent >= self.max_count or self.rate <= 0

    def due(self, now: float, burst: int = _BURST) -> int:
        if self.exhausted:
            return 0
        target = min(self.max_count, int((now - self.started) * self.rate) + 1)
        return max(0, min(burst, target - self.sent))


def _wait_for_start(start: StartHook | None) -> float:
    if start is not None:
        start()
    return time.monotonic()


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


@dataclass
class _Tally:
    sent: int = 0
    sent_bytes: int = 0
    answers: int = 0
    answer_bytes: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    sampled: int = 0

    def answer(self, data: bytes, sample: int = 64) -> None:
        self.answers += 1
        self.answer_bytes += len(data)
        if self.sampled < sample:  # decoding every answer would cost the attacker more than it shows
            self.sampled += 1
            code = _error_code(data)
            key = str(code) if code is not None else _message_class(data)
            self.codes[key] = self.codes.get(key, 0) + 1

    def as_dict(self, seconds: float) -> dict[str, Any]:
        return {
            "sent": self.sent, "sent_bytes": self.sent_bytes, "msgs_per_s": _rate(self.sent, seconds),
            "answers": self.answers, "answer_bytes": self.answer_bytes,
            "answers_per_request": round(self.answers / self.sent, 4) if self.sent else None,
            "bytes_answered_per_byte_sent": (round(self.answer_bytes / self.sent_bytes, 3)
                                             if self.sent_bytes else None),
            "answer_codes_sampled": dict(sorted(self.codes.items())),
        }


def _drain_udp(sock: socket.socket, tally: _Tally) -> None:
    for _ in range(_DRAIN):
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # ICMP errors of earlier sends
        tally.answer(data)


def _udp_send(sock: socket.socket, data: bytes, address: Address, tally: _Tally) -> bool:
    try:
        sock.sendto(data, address)
    except (BlockingIOError, InterruptedError):
        return False  # our own send buffer is full: the datagram is not counted as sent
    except OSError:
        return False
    tally.sent += 1
    tally.sent_bytes += len(data)
    return True


# ------------------------------------------------------------------------------- attack 1


def oversized(target: Target, *, duration_s: float, big_per_s: float, tcp_big_per_s: float,
              garbage_per_s: float, max_messages: int = 1_000_000, start: StartHook | None = None,
              seed: int = 1) -> dict[str, Any]:
    """64 KiB pathological requests and garbage over UDP; the 64 KiB kinds over one TCP connection.

    Over UDP the big messages alternate: a Binding of ~16,000 distinct unknown
    comprehension-required attributes, and a CreatePermission of ~5,400 XOR-PEER-ADDRESS
    attributes (unauthenticated: whatever decodes it, the answer is an error). Between them go
    truncated and garbage datagrams. Over TCP the same two big kinds at their own rate; if the
    server closes that connection it is not reopened (``tcp_closed_by_server``).
    """
    rng = random.Random(seed)
    udp_big = [unknown_attributes_binding(MAX_UDP_PAYLOAD), xor_peers_request(MAX_UDP_PAYLOAD)]
    tcp_big = [unknown_attributes_binding(20 + MAX_STUN_LENGTH), xor_peers_request(20 + MAX_STUN_LENGTH)]
    garbage = garbage_datagrams(rng)
    big, small, tcp = _Tally(), _Tally(), _Tally()
    # Two UDP sockets (source ports), so that answers are told apart by what they answer.
    udp = _loopback_udp(rcvbuf=4 << 20)
    junk = _loopback_udp(rcvbuf=1 << 20)
    udp.setblocking(False)
    junk.setblocking(False)
    stream: socket.socket | None = None
    tcp_error: str | None = None
    tcp_closed = False
    if tcp_big_per_s > 0:
        stream = socket.create_connection(target.require_tcp(), timeout=5.0)
        stream.setblocking(False)
    framer = StreamFramer()
    out = bytearray()  # the TCP message being written; at most one is queued
    tcp_deferred = 0
    selector = selectors.DefaultSelector()
    selector.register(udp, selectors.EVENT_READ)
    selector.register(junk, selectors.EVENT_READ)
    if stream is not None:
        selector.register(stream, selectors.EVENT_READ)
    began = _wait_for_start(start)
    deadline = began + duration_s
    pacers = (Pacer(big_per_s, max_messages, began), Pacer(garbage_per_s, max_messages, began),
              Pacer(tcp_big_per_s if stream is not None else 0, max_messages, began))
    try:
        while (now := time.monotonic()) < deadline and not all(p.exhausted for p in pacers):
            for _ in range(pacers[0].due(now)):
                message = _with_txid(udp_big[pacers[0].sent % 2], os.urandom(12))
                pacers[0].sent += 1
                _udp_send(udp, message, target.udp, big)
            for _ in range(pacers[1].due(now)):
                _udp_send(junk, garbage[pacers[1].sent % len(garbage)], target.udp, small)
                pacers[1].sent += 1
            if stream is not None and not tcp_closed:
                for _ in range(pacers[2].due(now, burst=4)):
                    pacers[2].sent += 1
                    if out:
                        tcp_deferred += 1  # the previous one is not written yet: skip, do not queue
                        continue
                    out += _with_txid(tcp_big[pacers[2].sent % 2], os.urandom(12))
                    tcp.sent += 1
                    tcp.sent_bytes += len(out)
                if out:
                    try:
                        written = stream.send(out)
                        del out[:written]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError as exc:
                        tcp_closed, tcp_error = True, errno.errorcode.get(exc.errno or 0, str(exc))
                        selector.unregister(stream)
            for key, _ in selector.select(timeout=_TICK_S):
                if key.fileobj is udp:
                    _drain_udp(udp, big)
                elif key.fileobj is junk:
                    _drain_udp(junk, small)
                elif stream is not None and not tcp_closed:
                    try:
                        chunk = stream.recv(1 << 16)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        chunk, tcp_error = b"", errno.errorcode.get(exc.errno or 0, str(exc))
                    if not chunk:
                        if not tcp_closed:
                            selector.unregister(stream)
                        tcp_closed = True
                        continue
                    try:
                        for frame in framer.feed(chunk):
                            tcp.answer(frame)
                    except FramingError:
                        pass
        elapsed = time.monotonic() - began
        # Answers still on their way (over UDP; the stream is not read any more).
        if stream is not None and not tcp_closed:
            selector.unregister(stream)
        settle = time.monotonic() + 0.3
        while time.monotonic() < settle:
            if not selector.select(timeout=0.05):
                continue
            _drain_udp(udp, big)
            _drain_udp(junk, small)
    finally:
        selector.close()
        udp.close()
        junk.close()
        if stream is not None:
            stream.close()
    result: dict[str, Any] = {
        "attack": "oversized", "duration_s": round(elapsed, 2),
        "udp_big": big.as_dict(elapsed), "udp_garbage": small.as_dict(elapsed), "tcp_big": tcp.as_dict(elapsed),
        "tcp_deferred": tcp_deferred, "tcp_closed_by_server": tcp_closed, "tcp_error": tcp_error,
    }
    result["sent"] = big.sent + small.sent + tcp.sent
    result["msgs_per_s"] = _rate(result["sent"], elapsed)
    result["answers"] = big.answers + small.answers + tcp.answers
    return result


# ------------------------------------------------------------------------------- attack 2

_401_METHODS = (Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND)


def flood_401(target: Target, *, duration_s: float, one_source_per_s: float, many_ports_per_s: float,
              ports: int, max_messages: int = 10_000_000, start: StartHook | None = None) -> dict[str, Any]:
    """Bare 20-byte Allocate/Refresh/CreatePermission/ChannelBind requests, each a 401 to answer.

    One socket sends ``one_source_per_s``; ``ports`` sockets (one source port each, all on
    127.0.0.1) share ``many_ports_per_s`` round robin. Answers are counted per part.
    """
    types = [_request_type(m) for m in _401_METHODS]
    single = _loopback_udp(rcvbuf=4 << 20)
    spread = [_loopback_udp(rcvbuf=1 << 20) for _ in range(max(0, ports))]
    socks = [single, *spread]
    selector = selectors.DefaultSelector()
    one, many = _Tally(), _Tally()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, one if sock is single else many)
    began = _wait_for_start(start)
    deadline = began + duration_s
    p_one = Pacer(one_source_per_s, max_messages, began)
    p_many = Pacer(many_ports_per_s if spread else 0, max_messages, began)
    counter = 0
    try:
        while (now := time.monotonic()) < deadline and not (p_one.exhausted and p_many.exhausted):
            for _ in range(p_one.due(now)):
                counter += 1
                p_one.sent += 1
                _udp_send(single, _HEADER.pack(types[counter & 3], 0, MAGIC_COOKIE, counter.to_bytes(12, "big")),
                          target.udp, one)
            for _ in range(p_many.due(now)):
                counter += 1
                sock = spread[p_many.sent % len(spread)]
                p_many.sent += 1
                _udp_send(sock, _HEADER.pack(types[counter & 3], 0, MAGIC_COOKIE, counter.to_bytes(12, "big")),
                          target.udp, many)
            for key, _ in selector.select(timeout=_TICK_S):
                _drain_udp(key.fileobj, key.data)  # type: ignore[arg-type]
        elapsed = time.monotonic() - began
        settle = time.monotonic() + 0.3
        while time.monotonic() < settle:
            for key, _ in selector.select(timeout=0.05):
                _drain_udp(key.fileobj, key.data)  # type: ignore[arg-type]
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    result: dict[str, Any] = {
        "attack": "flood_401", "duration_s": round(elapsed, 2), "ports": len(spread),
        "one_source": one.as_dict(elapsed), "many_ports": many.as_dict(elapsed),
    }
    result["sent"] = one.sent + many.sent
    result["msgs_per_s"] = _rate(result["sent"], elapsed)
    result["answers"] = one.answers + many.answers
    return result


# ------------------------------------------------------------------------------- attack 3


def permission_flood(target: Target, *, duration_s: float, requests_per_s: float, in_flight: int = 4,
                     network: str = "198.18.0.0/15", max_messages: int = 100_000,
                     start: StartHook | None = None, user: str = "flood") -> dict[str, Any]:
    """One authenticated allocation sending CreatePermission requests as big as the server takes.

    The first requests carry as many XOR-PEER-ADDRESS attributes as fit in a datagram (about
    5,400), every address distinct, walking through ``network``; once the network is used up the
    walk starts again (refreshing rather than adding). A request refused with 400 (too many
    attributes) or 508 (too many permissions) halves the count for the next ones, down to one:
    the attacker looks for the most state the server will still grant. At most ``in_flight``
    requests are unanswered at once, and at most ``requests_per_s`` are sent a second.
    Addresses in ``network`` are only permitted, never sent to; the server must allow them
    (``allowed_peers``) for the requests to be accepted.
    """
    net = ipaddress.ip_network(network)
    base, size = int(net.network_address), net.num_addresses
    client = TurnClient(target, user, rcvbuf=4 << 20)
    try:
        client.allocate()
        room = MAX_UDP_PAYLOAD - 20 - len(client.auth_attributes()) - 24 - 64  # 64: a longer nonce later
        first_size = per_request = min(room, MAX_STUN_LENGTH) // 12
        everything = xor_peer_block([base + i for i in range(size)])
    except BaseException:
        client.close()
        raise
    sock = client.sock
    tally = _Tally()
    pending: dict[bytes, tuple[int, float]] = {}  # txid -> (addresses, sent at)
    codes: dict[str, int] = {}
    granted = stale = 0
    addresses_sent = 0
    cursor = 0
    rtts: list[float] = []
    began = _wait_for_start(start)
    deadline = began + duration_s
    pacer = Pacer(requests_per_s, max_messages, began)
    try:
        while (now := time.monotonic()) < deadline and not pacer.exhausted:
            # A request unanswered for a second is given up on (counted as not answered).
            for txid, (_, sent_at) in list(pending.items()):
                if now - sent_at > 1.0:
                    del pending[txid]
            if len(pending) < in_flight:
                for _ in range(min(pacer.due(now), in_flight - len(pending))):
                    pacer.sent += 1
                    end = cursor + per_request
                    block = everything[12 * cursor: 12 * min(end, size)]
                    if end > size:
                        block += everything[: 12 * (end - size)]
                    txid = os.urandom(12)
                    if _udp_send(sock, client.sign(Method.CREATE_PERMISSION, block, txid), target.udp, tally):
                        pending[txid] = (per_request, time.monotonic())
                        addresses_sent += per_request
                        cursor = end % size
            try:
                sock.settimeout(_TICK_S)
                data = sock.recv(65536)
            except (socket.timeout, TimeoutError, BlockingIOError, InterruptedError):
                continue
            except OSError:
                continue
            tally.answer(data)
            entry = pending.pop(data[8:20], None)
            if entry is None:
                continue
            rtts.append(time.monotonic() - entry[1])
            code = _error_code(data)
            codes[str(code)] = codes.get(str(code), 0) + 1
            if code == 200:
                granted += entry[0]
            elif code == 438:
                stale += 1
                try:
                    client.nonce = str(decode_message(data).get(Attr.NONCE))
                except StunDecodeError:
                    pass
            elif code in (400, 508) and entry[0] == per_request and per_request > 1:
                per_request //= 2
        elapsed = time.monotonic() - began
    finally:
        client.close()
    result = {"attack": "permission_flood", "duration_s": round(elapsed, 2), "network": network,
              **tally.as_dict(elapsed), "requests_per_s": _rate(tally.sent, elapsed),
              "addresses_per_request_first": first_size, "addresses_per_request_last": per_request,
              "distinct_addresses_sent": min(size, addresses_sent), "answer_codes": codes,
              # Addresses in requests answered 200: an upper bound on the permissions held
              # (a refresh of an address already permitted counts again).
              "permissions_granted": granted, "stale_nonce": stale,
              "max_answer_ms": round(1000 * max(rtts), 1) if rtts else None,
              "median_answer_ms": round(1000 * statistics.median(rtts), 1) if rtts else None}
    return result


# ------------------------------------------------------------------------------- attack 4


def connection_flood(target: Target, *, duration_s: float, connections: int, connect_per_s: float,
                     start: StartHook | None = None) -> dict[str, Any]:
    """Open up to ``connections`` TCP connections to the TCP listener and hold them open.

    Each connection sends one Binding request once connected; answers and connections the
    server closes are counted. At the end every connection is reset (SO_LINGER 0).
    """
    address = target.require_tcp()
    selector = selectors.DefaultSelector()
    conns: dict[int, dict[str, Any]] = {}
    attempted = connected = failed = closed_by_server = answers = 0
    peak_open = open_now = 0
    last_connect: float | None = None
    connect_times: list[float] = []
    binding = _raw_message(_request_type(Method.BINDING), b"")
    began = _wait_for_start(start)
    deadline = began + duration_s
    pacer = Pacer(connect_per_s, connections, began)
    try:
        while (now := time.monotonic()) < deadline:
            for _ in range(pacer.due(now, burst=32)):
                pacer.sent += 1
                attempted += 1
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    sock.connect_ex(address)
                except OSError:
                    sock.close()
                    failed += 1
                    continue
                conns[sock.fileno()] = {"sock": sock, "state": "connecting", "at": time.monotonic(),
                                        "framer": StreamFramer()}
                selector.register(sock, selectors.EVENT_WRITE, sock.fileno())
            for key, events in selector.select(timeout=_TICK_S):
                entry = conns.get(key.data)
                if entry is None:
                    continue
                sock = entry["sock"]
                if entry["state"] == "connecting":
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        failed += 1
                        _forget(selector, conns, key.data)
                        continue
                    entry["state"] = "open"
                    connected += 1
                    open_now += 1
                    connect_times.append(time.monotonic() - entry["at"])
                    last_connect = time.monotonic()
                    try:
                        sock.send(binding)
                    except OSError:
                        pass
                    selector.modify(sock, selectors.EVENT_READ, key.data)
                    continue
                try:
                    chunk = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    closed_by_server += 1
                    open_now -= 1
                    _forget(selector, conns, key.data)
                    continue
                try:
                    answers += len(entry["framer"].feed(chunk))
                except FramingError:
                    pass
            peak_open = max(peak_open, open_now)
        elapsed = time.monotonic() - began
        held = sum(1 for e in conns.values() if e["state"] == "open")
    finally:
        for fd in list(conns):
            _forget(selector, conns, fd)
        selector.close()
    return {
        "attack": "connection_flood", "duration_s": round(elapsed, 2), "attempted": attempted,
        "connected": connected, "failed": failed, "closed_by_server": closed_by_server,
        "held_at_end": held, "peak_open": peak_open, "answers": answers,
        # How fast they were opened: from the start until the last one was connected.
        "open_s": round(last_connect - began, 3) if last_connect is not None else None,
        "connections_per_s": _rate(connected, last_connect - began) if last_connect is not None else None,
        "sent": attempted,
        "max_connect_ms": round(1000 * max(connect_times), 1) if connect_times else None,
    }


def _forget(selector: selectors.BaseSelector, conns: dict[int, dict[str, Any]], fd: int) -> None:
    entry = conns.pop(fd, None)
    if entry is None:
        return
    try:
        selector.unregister(entry["sock"])
    except (KeyError, ValueError):
        pass
    entry["sock"].close()


# ------------------------------------------------------------------------------- attack 5


def never_reads(target: Target, *, duration_s: float, requests_per_s: float, max_messages: int = 10_000_000,
                start: StartHook | None = None) -> dict[str, Any]:
    """One TCP connection pipelining Binding requests and never reading the answers.

    Its receive buffer is made small. Requests the kernel will not take at once are not queued
    here (``send_blocked``): the point is what the server holds, not what the client does. After
    the attack the answers still waiting are read (bounded) and counted.
    """
    address = target.require_tcp()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5.0)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    request = _raw_message(_request_type(Method.BINDING), b"")
    sent = blocked = 0
    closed_by_server, send_error = False, None
    began = _wait_for_start(start)
    deadline = began + duration_s
    pacer = Pacer(requests_per_s, max_messages, began)
    try:
        while (now := time.monotonic()) < deadline and not pacer.exhausted and not closed_by_server \
                and send_error is None:
            n = pacer.due(now, burst=1024)
            if n:
                pacer.sent += n
                batch = b"".join(_with_txid(request, (sent + i).to_bytes(12, "big")) for i in range(n))
                try:
                    written = sock.send(batch)
                except (BlockingIOError, InterruptedError):
                    written = 0
                except OSError as exc:
                    closed_by_server, send_error = True, errno.errorcode.get(exc.errno or 0, str(exc))
                    written = 0
                whole = written // 20
                if written % 20:
                    # Finish the request that was cut: the stream must stay framed.
                    rest = batch[written: (whole + 1) * 20]
                    try:
                        sock.settimeout(1.0)
                        sock.sendall(rest)
                        whole += 1
                    except (socket.timeout, TimeoutError):
                        # The server stopped reading: the stream cannot be kept framed, so stop.
                        send_error = "send_timeout"
                    except OSError as exc:
                        closed_by_server, send_error = True, errno.errorcode.get(exc.errno or 0, str(exc))
                    finally:
                        sock.setblocking(False)
                sent += whole
                blocked += n - whole
            time.sleep(_TICK_S)
        elapsed = time.monotonic() - began
        # Now read what the server still has queued for us: how much it buffered.
        framer = StreamFramer()
        read_answers = read_bytes = 0
        quiet_deadline = time.monotonic() + 0.5
        hard_deadline = time.monotonic() + 3.0
        sock.setblocking(True)
        while not closed_by_server and time.monotonic() < min(quiet_deadline, hard_deadline):
            sock.settimeout(max(0.01, min(quiet_deadline, hard_deadline) - time.monotonic()))
            try:
                chunk = sock.recv(1 << 16)
            except (socket.timeout, TimeoutError):
                break
            except OSError:
                break
            if not chunk:
                closed_by_server = True
                break
            read_bytes += len(chunk)
            try:
                read_answers += len(framer.feed(chunk))
            except FramingError:
                break
            quiet_deadline = time.monotonic() + 0.5
    finally:
        sock.close()
    return {
        "attack": "never_reads", "duration_s": round(elapsed, 2), "sent": sent, "sent_bytes": 20 * sent,
        "msgs_per_s": _rate(sent, elapsed), "send_blocked": blocked, "closed_by_server": closed_by_server,
        "send_error": send_error, "answers_read_after": read_answers, "answer_bytes_read_after": read_bytes,
    }


ATTACKS: dict[str, Callable[..., dict[str, Any]]] = {
    "oversized": oversized,
    "flood_401": flood_401,
    "permission_flood": permission_flood,
    "connection_flood": connection_flood,
    "never_reads": never_reads,
}


# ------------------------------------------------------------------------------- the reference call


@dataclass
class MediaDirection:
    """One direction of the reference call: what was sent when, and what arrived when."""

    name: str
    send_times: list[float] = field(default_factory=list)  # by sequence number (Unix seconds)
    arrivals: dict[int, float] = field(default_factory=dict)  # sequence number -> kernel arrival time
    duplicates: int = 0
    reordered: int = 0
    highest: int = -1

    def arrived(self, seq: int, at: float) -> None:
        if seq in self.arrivals:
            self.duplicates += 1
            return
        if seq < self.highest:
            self.reordered += 1
        self.highest = max(self.highest, seq)
        self.arrivals[seq] = at

    def summary(self) -> dict[str, Any]:
        sent, received = len(self.send_times), len(self.arrivals)
        out: dict[str, Any] = {
            "sent": sent, "received": received, "duplicates": self.duplicates, "reordered": self.reordered,
            "loss_pct": round(100.0 * (sent - received) / sent, 3) if sent else None,
        }
        if not sent:
            return out
        first_send, last_send = self.send_times[0], self.send_times[-1]
        out["sender_max_gap_ms"] = round(1000 * max((b - a for a, b in zip(self.send_times, self.send_times[1:])),
                                                    default=0.0), 2)
        arrivals = sorted(self.arrivals.values())
        edges = [first_send, *arrivals]
        gap = max((b - a for a, b in zip(edges, edges[1:])), default=0.0)
        if not arrivals or last_send > arrivals[-1]:
            gap = max(gap, last_send - (arrivals[-1] if arrivals else first_send))
        out["max_gap_ms"] = round(1000 * gap, 2)
        worst, longest = self._relay_gaps()
        out["max_relay_gap_ms"] = round(1000 * worst, 2)
        # When the longest stalls happened (seconds after the first send): periodic ones point
        # at a timer or a sweep, one at the start at set-up work.
        out["longest_relay_gaps"] = [[round(at - first_send, 3), round(1000 * g, 2)] for g, at in longest]
        latencies = sorted(self.arrivals[s] - self.send_times[s] for s in self.arrivals)
        if latencies:
            out["median_latency_ms"] = round(1000 * statistics.median(latencies), 3)
            out["p99_latency_ms"] = round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)
            out["max_latency_ms"] = round(1000 * latencies[-1], 3)
        return out

    def _relay_gaps(self, keep: int = 5) -> tuple[float, list[tuple[float, float]]]:
        """The longest stretch without an arrival while some packet was sent and not yet received,
        and the ``keep`` longest such stretches as (length, when it ended)."""
        inf = float("inf")
        # Packets in arrival order, the lost ones last; for each position the earliest send time
        # of it and everything after it: what was still in flight at the previous arrival.
        order = sorted(range(len(self.send_times)), key=lambda s: self.arrivals.get(s, inf))
        suffix_min = [0.0] * (len(order) + 1)
        suffix_min[len(order)] = inf
        for i in range(len(order) - 1, -1, -1):
            suffix_min[i] = min(self.send_times[order[i]], suffix_min[i + 1])
        gaps: list[tuple[float, float]] = []
        previous = -inf
        end = self.send_times[-1]
        for i, seq in enumerate(order):
            at = self.arrivals.get(seq, inf)
            if at == inf:
                # Lost from here on: the stretch runs until the last send.
                gaps.append((end - max(previous, suffix_min[i]), end))
                break
            gaps.append((at - max(previous, suffix_min[i]), at))
            previous = at
        longest = heapq.nlargest(keep, gaps)
        return (max(0.0, longest[0][0]) if longest else 0.0), [g for g in longest if g[0] > 0]


def _enable_timestamps(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return True
    except OSError:
        return False


def _recv_stamped(sock: socket.socket) -> tuple[bytes, float]:
    data, ancillary, _flags, _addr = sock.recvmsg(2048, socket.CMSG_SPACE(_TIMESPEC.size))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(payload)
            return data, sec + nsec / 1e9
    return data, time.time()


def reference_call(target: Target, *, duration_s: float, rate_pps: float = 50.0, size: int = 200,
                   start: StartHook | None = None, drain_s: float = 0.5, user: str = "call",
                   release: bool = True) -> dict[str, Any]:
    """Two allocations relaying ChannelData to each other for ``duration_s`` seconds.

    Set up (Allocate, CreatePermission, ChannelBind, both sides) before ``start`` is called;
    media runs after it returns. Returns per direction ("a_to_b", "b_to_a") the counts, loss,
    gaps and latencies (see the module docstring), and the worst of the two in ``loss_pct``,
    ``max_gap_ms``, ``max_relay_gap_ms``. With ``target.pid`` set, the server's RSS is sampled
    twice a second (``server_rss_max_kib``).
    """
    if size < _MEDIA.size:
        raise ValueError(f"size must be at least {_MEDIA.size}")
    a = TurnClient(target, f"{user}-a", rcvbuf=1 << 20)
    b = TurnClient(target, f"{user}-b", rcvbuf=1 << 20)
    try:
        ra, rb = a.allocate(), b.allocate()
        a.permit(rb)
        b.permit(ra)
        a.bind(CHANNEL, rb)
        b.bind(CHANNEL, ra)
        stamped = _enable_timestamps(a.sock) and _enable_timestamps(b.sock)
        result = _media(target, a, b, duration_s=duration_s, rate_pps=rate_pps, size=size, start=start,
                        drain_s=drain_s)
        result["kernel_timestamps"] = stamped
        if release:
            result["released"] = a.release() and b.release()
        return result
    finally:
        a.close()
        b.close()


def _media(target: Target, a: TurnClient, b: TurnClient, *, duration_s: float, rate_pps: float,
           size: int, start: StartHook | None, drain_s: float) -> dict[str, Any]:
    directions = (MediaDirection("a_to_b"), MediaDirection("b_to_a"))
    # Direction 0 is sent by a and received by b; 1 the other way.
    senders, receivers = (a.sock, b.sock), (b.sock, a.sock)
    pad = bytes(size - _MEDIA.size)
    header = struct.pack("!HH", CHANNEL, size)
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(receivers):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
    for sock in senders:
        sock.setblocking(False)
    total = max(1, int(duration_s * rate_pps))
    interval = 1.0 / rate_pps
    foreign = 0
    rss_max = 0
    next_rss = 0.0
    began = _wait_for_start(start)
    t0 = began + 0.01
    next_seq = 0
    drain_until = float("inf")
    send_errors = 0
    try:
        while True:
            now = time.monotonic()
            while next_seq < total and t0 + next_seq * interval <= now:
                for index, sock in enumerate(senders):
                    sent_at = time.time()
                    packet = header + _MEDIA.pack(index, next_seq, sent_at) + pad
                    try:
                        sock.sendto(packet, target.udp)
                    except OSError:
                        send_errors += 1
                    directions[index].send_times.append(sent_at)
                next_seq += 1
                if next_seq == total:
                    drain_until = time.monotonic() + drain_s
            if now >= drain_until:
                break
            if target.pid is not None and now >= next_rss:
                rss_max = max(rss_max, procfs.rss_kib(target.pid))
                next_rss = now + 0.5
            wake = t0 + next_seq * interval if next_seq < total else drain_until
            for key, _ in selector.select(timeout=max(0.0, min(wake - time.monotonic(), 0.05))):
                sock, index = key.fileobj, key.data
                for _ in range(_DRAIN):
                    try:
                        data, at = _recv_stamped(sock)  # type: ignore[arg-type]
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    if len(data) < 4 + _MEDIA.size or data[0] < 0x40 or data[0] > 0x7F:
                        foreign += 1
                        continue
                    direction, seq, _ = _MEDIA.unpack_from(data, 4)
                    if direction != index or seq >= total:
                        foreign += 1
                        continue
                    directions[index].arrived(seq, at)
    finally:
        selector.close()
    out: dict[str, Any] = {"duration_s": duration_s, "rate_pps": rate_pps, "size": size,
                           "foreign": foreign, "send_errors": send_errors}
    for direction in directions:
        out[direction.name] = direction.summary()
    for key in ("loss_pct", "max_gap_ms", "max_relay_gap_ms", "sender_max_gap_ms", "max_latency_ms"):
        values = [out[d.name].get(key) for d in directions]
        out[key] = max((v for v in values if v is not None), default=None)
    if target.pid is not None:
        out["server_rss_max_kib"] = rss_max
    return out


def meets_requirement(call: dict[str, Any], *, max_loss_pct: float = 1.0, max_gap_ms: float = 100.0,
                      gap_key: str = "max_relay_gap_ms") -> bool:
    """Both directions within the loss and gap limits (the gap by ``gap_key``)."""
    for name in ("a_to_b", "b_to_a"):
        d = call.get(name, {})
        loss, gap = d.get("loss_pct"), d.get(gap_key)
        if loss is None or gap is None or loss > max_loss_pct or gap > max_gap_ms:
            return False
    return True


# ------------------------------------------------------------------------------- running phases


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process's threads have spent runnable but waiting for a CPU (schedstat(5)).

    On a shared machine this tells a stall of the server from a server that was not given a CPU:
    a call gap of 300 ms in a phase where the server waited 300 ms for a core is not its doing.
    0.0 when unreadable.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as handle:
                total += int(handle.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9



@dataclass(frozen=True)
class Rates:
    """How hard each attack pushes. Every attack also stops at the end of its phase."""

    big_per_s: float  # UDP 64 KiB pathological requests
    tcp_big_per_s: float  # the same over one TCP connection
    garbage_per_s: float  # truncated and garbage datagrams
    flood_one_source_per_s: float  # bare requests from one source port
    flood_many_ports_per_s: float  # ... spread over flood_ports source ports
    flood_ports: int
    permission_requests_per_s: float  # CreatePermission requests, ~5,400 addresses each
    permission_in_flight: int
    connections: int  # TCP connections held open
    connect_per_s: float
    never_reads_per_s: float  # Binding requests pipelined on a connection that never reads

    def kwargs(self, attack: str) -> dict[str, Any]:
        if attack == "oversized":
            return {"big_per_s": self.big_per_s, "tcp_big_per_s": self.tcp_big_per_s,
                    "garbage_per_s": self.garbage_per_s}
        if attack == "flood_401":
            return {"one_source_per_s": self.flood_one_source_per_s,
                    "many_ports_per_s": self.flood_many_ports_per_s, "ports": self.flood_ports}
        if attack == "permission_flood":
            return {"requests_per_s": self.permission_requests_per_s, "in_flight": self.permission_in_flight}
        if attack == "connection_flood":
            return {"connections": self.connections, "connect_per_s": self.connect_per_s}
        if attack == "never_reads":
            return {"requests_per_s": self.never_reads_per_s}
        raise KeyError(attack)


# What the test suite runs: a defended server should shrug these off on one core.
MODERATE = Rates(big_per_s=10, tcp_big_per_s=5, garbage_per_s=500, flood_one_source_per_s=2000,
                 flood_many_ports_per_s=1000, flood_ports=32, permission_requests_per_s=4,
                 permission_in_flight=2, connections=200, connect_per_s=400, never_reads_per_s=2000)
# The benchmark: harder, several thousand requests a second where the brief of each attack says so.
FULL = Rates(big_per_s=30, tcp_big_per_s=10, garbage_per_s=2000, flood_one_source_per_s=5000,
             flood_many_ports_per_s=5000, flood_ports=128, permission_requests_per_s=10,
             permission_in_flight=4, connections=500, connect_per_s=1000, never_reads_per_s=10000)


class _Child:
    """One attack in its own process: ``python -m benchmarks.attack worker``, talking JSON lines.

    The child reads its orders from stdin, sets up, writes ``ready``, waits for ``go`` on stdin,
    attacks and writes ``result <json>``. A child is this module's own process and is stopped
    by its PID if it outlives its phase.
    """

    def __init__(self, name: str, target: Target, kwargs: dict[str, Any]) -> None:
        self.name = name
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.attack", "worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, cwd=str(REPO_ROOT), env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        orders = {"name": name, "target": dataclasses.asdict(target), "kwargs": kwargs}
        self.proc.stdin.write((json.dumps(orders) + "\n").encode())
        self.proc.stdin.flush()
        self.lines: list[str] = []
        self._buf = b""

    def read_line(self, deadline: float) -> str | None:
        """The child's next line of output, or None at the deadline or when it exited."""
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def go(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it exited; its missing result says so

    def result(self, deadline: float) -> dict[str, Any]:
        while (line := self.read_line(deadline)) is not None:
            if line.startswith("result "):
                return cast(dict[str, Any], json.loads(line[len("result "):]))
        return {"attack": self.name, "error": f"no result (exit {self.proc.poll()}): {self.stderr_tail()}"}

    def stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read().decode(errors="replace")[-800:].strip()
        except OSError:
            return ""

    def stop(self, timeout_s: float) -> None:
        try:
            self.proc.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self.stderr.close()


def _worker_main() -> int:
    """The child side of :class:`_Child`."""
    orders = json.loads(sys.stdin.readline())
    name = orders["name"]
    raw = orders["target"]
    target = Target(udp=tuple(raw["udp"]), tcp=tuple(raw["tcp"]) if raw["tcp"] else None,  # type: ignore[arg-type]
                    secret=raw["secret"], realm=raw["realm"], pid=raw["pid"])
    started = False

    def start() -> None:
        nonlocal started
        started = True
        print("ready", flush=True)
        readable, _, _ = select.select([sys.stdin], [], [], READY_TIMEOUT_S)
        if not readable or sys.stdin.readline().strip() != "go":
            raise AttackError("never told to start")

    try:
        result = ATTACKS[name](target, start=start, **orders["kwargs"])
    except Exception as exc:  # the parent must hear of it rather than wait
        result = {"attack": name, "error": f"{type(exc).__name__}: {exc}"}
        if not started:
            print("ready", flush=True)
    print("result " + json.dumps(result), flush=True)
    return 0


def run_phase(target: Target, attacks: dict[str, dict[str, Any]], *, duration_s: float,
              call_rate_pps: float = 50.0, call_size: int = 200, user: str = "call") -> dict[str, Any]:
    """The reference call for ``duration_s`` while ``attacks`` (name -> keyword arguments) run.

    Each attack runs in its own child process, with ``duration_s`` as its time limit; all start
    at the same moment as the call's media. Children still running well after the phase are
    killed (they are this function's own processes). Also reads the server's RSS and CPU time
    when ``target.pid`` is set.
    """
    children: list[_Child] = []
    results: dict[str, Any] = {}
    rss_before = procfs.rss_kib(target.pid) if target.pid else None
    told_go = False
    try:
        for name, kwargs in attacks.items():
            children.append(_Child(name, target, {"duration_s": duration_s, **kwargs}))
        started: list[float] = []

        def start() -> None:
            nonlocal told_go
            deadline = time.monotonic() + READY_TIMEOUT_S
            for child in children:
                line = child.read_line(deadline)
                if line != "ready":
                    raise AttackError(f"attack {child.name} did not get ready ({line!r}): {child.stderr_tail()}")
            if target.pid:
                started.append(runqueue_wait_s(target.pid))
                started.append(procfs.cpu_seconds(target.pid))
            started.append(time.monotonic())
            for child in children:
                child.go()
            told_go = True

        call = reference_call(target, duration_s=duration_s, rate_pps=call_rate_pps, size=call_size,
                              start=start, user=user)
        wall_s = time.monotonic() - started[-1]
        cpu_s = procfs.cpu_seconds(target.pid) - started[1] if target.pid else None
        wait_s = runqueue_wait_s(target.pid) - started[0] if target.pid else None
        deadline = time.monotonic() + JOIN_GRACE_S
        for child in children:
            results[child.name] = child.result(deadline)
    finally:
        # Children never told to go (the call failed to set up) are stopped at once.
        for child in children:
            child.stop(5.0 if told_go else 0.0)
    out: dict[str, Any] = {"call": call, "attacks": results}
    if target.pid:
        out["rss_before_kib"] = rss_before
        out["rss_after_kib"] = procfs.rss_kib(target.pid)
        # From the moment media and attacks started until the call (and its drain) ended.
        out["server_cpu_pct"] = round(100.0 * cpu_s / wall_s, 1) if cpu_s is not None and wall_s > 0 else None
        # Time the server was ready to run but had no CPU: the machine's share of any stall.
        out["server_runqueue_wait_ms"] = round(1000 * wait_s, 1) if wait_s is not None else None
    return out


PHASES = ("baseline", *ATTACKS, "all_at_once", "after")


def run_scenario(target: Target, *, rates: Rates = FULL, phase_s: float = 8.0, baseline_s: float = 5.0,
                 settle_s: float = 1.0, log: Callable[[str], None] = lambda _msg: None) -> dict[str, Any]:
    """Baseline, each attack alone, all at once, then a fresh call: every phase's numbers.

    One server for all phases, so what an attack leaves behind (permissions, RSS) carries on.
    After each phase the server gets ``settle_s``, then one Binding over UDP (and over TCP) is
    timed: does it still answer?
    """
    phases: dict[str, Any] = {}
    rss_start = procfs.rss_kib(target.pid) if target.pid else None
    plan: list[tuple[str, dict[str, dict[str, Any]], float]] = [("baseline", {}, baseline_s)]
    plan += [(name, {name: rates.kwargs(name)}, phase_s) for name in ATTACKS]
    plan.append(("all_at_once", {name: rates.kwargs(name) for name in ATTACKS}, phase_s))
    plan.append(("after", {}, baseline_s))
    for index, (name, attacks, seconds) in enumerate(plan):
        if target.tcp is None:
            attacks = {k: v for k, v in attacks.items() if k not in ("connection_flood", "never_reads")}
            if name in ("connection_flood", "never_reads"):
                continue
        log(f"under_attack: {name} ({seconds:g} s) ...")
        try:
            phase = run_phase(target, attacks, duration_s=seconds, user=f"call{index}")
        except AttackError as exc:
            phase = {"error": str(exc)}
        if "call" in phase:
            # Recorded, not asserted: the test suite asserts it at moderate rates.
            phase["requirement_met"] = meets_requirement(phase["call"])
        time.sleep(settle_s)
        phase["binding_after_ms"] = binding_ms(target.udp)
        if target.tcp is not None:
            phase["tcp_binding_after_ms"] = binding_ms(target.tcp, transport="tcp")
        phases[name] = phase
        call = phase.get("call", {})
        log(f"under_attack: {name}: loss {call.get('loss_pct')} %, max gap {call.get('max_gap_ms')} ms "
            f"(relay {call.get('max_relay_gap_ms')} ms), server RSS {phase.get('rss_after_kib')} KiB, "
            f"Binding after {phase['binding_after_ms']} ms"
            + (f" ERROR {phase['error']}" if "error" in phase else ""))
    return {"phases": phases, "rss_start_kib": rss_start,
            "rss_end_kib": procfs.rss_kib(target.pid) if target.pid else None,
            "rates": rates.__dict__, "phase_s": phase_s, "baseline_s": baseline_s}


def flatten(scenario: dict[str, Any]) -> dict[str, Any]:
    """The scenario's headline numbers as flat metrics (the benchmark table's rows)."""
    phases = scenario["phases"]
    out: dict[str, Any] = {"rss_start_kib": scenario.get("rss_start_kib"), "rss_end_kib": scenario.get("rss_end_kib")}
    errors, problems = [], []
    for name in PHASES:
        phase = phases.get(name)
        if phase is None:
            continue
        if "error" in phase:  # the call itself could not run: this phase measured nothing
            errors.append(f"{name}: {phase['error']}")
        call = phase.get("call", {})
        out[f"{name}_loss_pct"] = call.get("loss_pct")
        out[f"{name}_max_gap_ms"] = call.get("max_gap_ms")
        out[f"{name}_relay_gap_ms"] = call.get("max_relay_gap_ms")
        out[f"{name}_server_cpu_pct"] = phase.get("server_cpu_pct")
        out[f"{name}_binding_after_ms"] = phase.get("binding_after_ms")
        for attack in phase.get("attacks", {}).values():
            if attack.get("error"):  # an attacker failed: the call's numbers still stand
                problems.append(f"{name}/{attack.get('attack')}: {attack['error']}")
    alone = {name: phases.get(name, {}).get("attacks", {}).get(name, {}) for name in ATTACKS}
    out["oversized_msgs_per_s"] = alone["oversized"].get("msgs_per_s")
    out["flood_401_msgs_per_s"] = alone["flood_401"].get("msgs_per_s")
    for part in ("one_source", "many_ports"):
        tally = alone["flood_401"].get(part, {})
        out[f"flood_401_{part}_answers_per_request"] = tally.get("answers_per_request")
        out[f"flood_401_{part}_bytes_out_per_byte_in"] = tally.get("bytes_answered_per_byte_sent")
    out["permission_flood_requests_per_s"] = alone["permission_flood"].get("requests_per_s")
    out["permission_flood_permissions_granted"] = alone["permission_flood"].get("permissions_granted")
    out["connection_flood_peak_open"] = alone["connection_flood"].get("peak_open")
    out["connection_flood_closed_by_server"] = alone["connection_flood"].get("closed_by_server")
    out["never_reads_msgs_per_s"] = alone["never_reads"].get("msgs_per_s")
    if problems:
        out["problems"] = "; ".join(problems)
    if errors:
        out["error"] = "; ".join(errors)
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["worker"]:
        sys.exit("usage: python -m benchmarks.attack worker  (run by run_phase, reads its orders on stdin)")
    sys.exit(_worker_main())
