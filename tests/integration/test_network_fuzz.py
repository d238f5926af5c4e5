"""Network fuzzing: captures of real clients (aioice, coturn's turnutils_*, Chromium; see
tests/data/captures/) replayed with deterministic mutations at a running server over UDP, TCP and
TLS. Afterwards the server is alive, answers a Binding on every transport, a reference
allocation made before the fuzzing still relays ChannelData both ways, no internal error was
counted and no traceback was logged.

The mutations: bit flips, truncation, length fields changed (the STUN header's, ChannelData's,
an attribute's), an attribute duplicated, two messages spliced or glued together, random bytes,
and messages re-signed with the server's own credentials and nonce after their attributes were
changed, so that mutated attribute values get past authentication into the request handlers.
Everything comes from one seeded RNG per transport (``TURN_FUZZ_SEED`` changes the seed).

The short form sends a few thousand datagrams or frames per transport; the long form 100,000:

    TURN_LONG_TESTS=1 python3 -m pytest -q -p no:cacheprovider tests/integration/test_network_fuzz.py

All traffic goes to 127.0.0.0/8, and the server is told to relay to no address but its own
relay ports (``denied_peers`` covers everything), so a mutated peer address cannot send anything
anywhere else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import socket
import ssl
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from turnserver.auth import long_term_key
from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_message

from .captures import is_stun, load_captures
from .raw_client import RawTurnClient, code
from .server import RunningServer
from .test_soak import scrape_now
from .test_stream_support import client_tls_context

# Not TURND_*: the server, which inherits the environment, reads those as its options.
LONG = os.environ.get("TURN_LONG_TESTS", "") not in ("", "0")
SEED = int(os.environ.get("TURN_FUZZ_SEED", "20240601"))
COUNT = 100_000 if LONG else 3000  # datagrams, or frames, per transport
FRAMES_PER_CONNECTION = 50
SYNC_EVERY = 200  # datagrams between two Bindings that wait for the server to catch up
FUZZ_IPS = tuple(f"127.0.3.{n}" for n in range(1, 9))  # the fuzzer's own source addresses
FUZZ_RELAY_PORTS = (57000, 57999)
STEP_TIMEOUT_S = 3.0
RUN_TIMEOUT_S = 1800.0 if LONG else 40.0  # per transport

COOKIE = b"\x21\x12\xa4\x42"
AUTH_ATTRS = {Attr.USERNAME, Attr.REALM, Attr.NONCE, Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256,
              Attr.FINGERPRINT, Attr.USERHASH, Attr.PASSWORD_ALGORITHM, Attr.PASSWORD_ALGORITHMS}
INTERESTING_LENGTHS = (0, 1, 3, 4, 7, 8, 20, 0x7FFF, 0x8000, 0xFFFC, 0xFFFF)


def fuzz_options(**extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "listen_tcp": ["127.0.0.1:0"],
        "listen_tls": ["127.0.0.1:0"],  # no certificate configured: the self-signed default
        "metrics_listen": "127.0.0.1:0",
        "relay_port_min": FUZZ_RELAY_PORTS[0],
        "relay_port_max": FUZZ_RELAY_PORTS[1],
        # Relay to the server's own relay ports only: no mutated address leaves the host.
        "denied_peers": ["0.0.0.0/0", "::/0"],
        # The captures include coturn's RFC 5766 channel numbers.
        "legacy_channel_numbers": True,
    }
    options.update(extra)
    return options


# --------------------------------------------------------------------------- wire helpers


def parse_stun(data: bytes) -> tuple[int, bytes, list[tuple[int, bytes]]] | None:
    """(message type, transaction ID, attributes as raw TLVs) of a well-formed STUN message."""
    if not is_stun(data) or len(data) < 20:
        return None
    msg_type, length = struct.unpack_from("!HH", data)
    end = min(len(data), 20 + length)
    attrs, offset = [], 20
    while offset + 4 <= end:
        attr_type, attr_len = struct.unpack_from("!HH", data, offset)
        attrs.append((attr_type, data[offset + 4:offset + 4 + attr_len]))
        offset += 4 + ((attr_len + 3) & ~3)
    return msg_type, data[8:20], attrs


def tlv(attr_type: int, value: bytes, declared: int | None = None) -> bytes:
    length = len(value) if declared is None else declared
    return struct.pack("!HH", attr_type, length) + value + b"\x00" * (-len(value) % 4)


def build_stun(msg_type: int, txid: bytes, attrs: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(tlv(t, v) for t, v in attrs)
    return struct.pack("!HH", msg_type, len(body)) + COOKIE + txid + body


def sign(msg_type: int, txid: bytes, attrs: list[tuple[int, bytes]], key: bytes, fingerprint: bool) -> bytes:
    """RFC 8489 §14.5 and §14.7, written out here rather than taken from the server's codec."""
    body = b"".join(tlv(t, v) for t, v in attrs)
    header = struct.pack("!HH", msg_type, len(body) + 24) + COOKIE + txid
    mac = hmac.new(key, header + body, hashlib.sha1).digest()
    out = header + body + tlv(Attr.MESSAGE_INTEGRITY, mac)
    if fingerprint:
        out = struct.pack("!HH", msg_type, len(body) + 32) + out[4:]
        crc = (zlib.crc32(out) ^ 0x5354554E) & 0xFFFFFFFF
        out += tlv(Attr.FINGERPRINT, struct.pack("!I", crc))
    return out


def reframe(data: bytes, rng: random.Random) -> bytes:
    """The mutated bytes made one whole frame again (the header's length says how long it is),
    so that the frames after it on the same stream are still read as frames."""
    if len(data) >= 20 and data[0] < 0x40:
        # A stream cannot tell where a message with a broken magic cookie ends: restored.
        body = data[20:] + b"\x00" * (-len(data) % 4)
        return data[:2] + struct.pack("!H", len(body)) + COOKIE + data[8:20] + body
    if len(data) >= 4 and 0x40 <= data[0] < 0x80:
        return pad_for_stream(data[:2] + struct.pack("!H", len(data) - 4) + data[4:])
    # Neither: carried as the payload of ChannelData on some channel.
    return pad_for_stream(struct.pack("!HH", rng.randint(0x4000, 0x7FFF), len(data)) + data)


def pad_for_stream(frame: bytes) -> bytes:
    """ChannelData on a stream is padded to a multiple of 4 (RFC 8656 §12.5)."""
    return frame + b"\x00" * (-len(frame) % 4) if frame and 0x40 <= frame[0] < 0x80 else frame


# --------------------------------------------------------------------------- mutations


@dataclass
class Credentials:
    username: str
    realm: str
    key: bytes
    nonces: dict[str, str]  # by source IP: the server binds a nonce to the client's address


@dataclass
class Mutator:
    rng: random.Random
    corpus: list[bytes]
    creds: Credentials
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ops: list[tuple[str, Callable[[bytes, str], bytes]]] = [
            ("bit_flip", self.bit_flip), ("truncate", self.truncate), ("length", self.length_field),
            ("duplicate", self.duplicate_attribute), ("splice", self.splice), ("random", self.random_bytes),
            ("resign", self.resign), ("resign", self.resign), ("as_is", lambda data, ip: data),
        ]

    def one(self, source_ip: str) -> bytes:
        data = self.rng.choice(self.corpus)
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            name, op = self.rng.choice(self.ops)
            self.counts[name] = self.counts.get(name, 0) + 1
            data = op(data, source_ip)
        return data[:65535]

    def bit_flip(self, data: bytes, _: str) -> bytes:
        if not data:
            return data
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 8)):
            at = self.rng.randrange(len(out))
            out[at] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    def truncate(self, data: bytes, _: str) -> bytes:
        return data[:self.rng.randrange(len(data))] if data else data

    def length_field(self, data: bytes, _: str) -> bytes:
        if len(data) < 4:
            return data
        value = self.rng.choice(INTERESTING_LENGTHS + (len(data) - 4, len(data) - 20, self.rng.randrange(65536)))
        value &= 0xFFFF
        parsed = parse_stun(data)
        if parsed is not None and parsed[2] and self.rng.random() < 0.5:
            # An attribute's length instead of the header's.
            offset, index = 20, self.rng.randrange(len(parsed[2]))
            for attr_type, value_bytes in parsed[2][:index]:
                offset += 4 + ((len(value_bytes) + 3) & ~3)
            if offset + 4 <= len(data):
                return data[:offset + 2] + struct.pack("!H", value) + data[offset + 4:]
        return data[:2] + struct.pack("!H", value) + data[4:]

    def duplicate_attribute(self, data: bytes, _: str) -> bytes:
        parsed = parse_stun(data)
        if parsed is None or not parsed[2]:
            return data + data[-self.rng.randint(1, 16):]
        msg_type, txid, attrs = parsed
        copy = self.rng.choice(attrs)
        attrs.insert(self.rng.randint(0, len(attrs)), copy)
        return build_stun(msg_type, txid, attrs)

    def splice(self, data: bytes, _: str) -> bytes:
        other = self.rng.choice(self.corpus)
        if self.rng.random() < 0.5:
            return data + other  # two messages in one datagram or back to back
        cut_a = self.rng.randint(0, len(data))
        cut_b = self.rng.randint(0, len(other))
        return data[:cut_a] + other[cut_b:]

    def random_bytes(self, data: bytes, _: str) -> bytes:
        size = self.rng.randint(0, 1500)
        junk = self.rng.randbytes(size)
        roll = self.rng.random()
        if roll < 0.3 and len(data) >= 20:  # a sound header over junk
            return data[:2] + struct.pack("!H", size & ~3) + COOKIE + data[8:20] + junk[:size & ~3]
        if roll < 0.5:  # ChannelData-looking
            return struct.pack("!HH", self.rng.randint(0x4000, 0x7FFF), size) + junk
        return junk

    def resign(self, data: bytes, source_ip: str) -> bytes:
        """Change the attributes, then sign like a client that holds the credentials."""
        parsed = parse_stun(data)
        nonce = self.creds.nonces.get(source_ip)
        if parsed is None or nonce is None:
            return data
        msg_type, _, attrs = parsed
        attrs = [(t, v) for t, v in attrs if t not in AUTH_ATTRS]
        rng = self.rng
        for _ in range(rng.randint(0, 3)):
            roll = rng.random()
            if attrs and roll < 0.25:  # flip bits in one value
                i = rng.randrange(len(attrs))
                value = bytearray(attrs[i][1])
                for _ in range(rng.randint(1, 4)):
                    if value:
                        value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
                attrs[i] = (attrs[i][0], bytes(value))
            elif attrs and roll < 0.4:  # resize one value
                i = rng.randrange(len(attrs))
                value = attrs[i][1]
                attrs[i] = (attrs[i][0], value[:rng.randint(0, len(value))] if rng.random() < 0.5
                            else value + rng.randbytes(rng.randint(1, 24)))
            elif attrs and roll < 0.55:  # duplicate one
                attrs.insert(rng.randint(0, len(attrs)), rng.choice(attrs))
            elif attrs and roll < 0.65:  # drop one
                attrs.pop(rng.randrange(len(attrs)))
            elif roll < 0.8:  # one of the corpus' attribute types with another value
                attr_type = rng.choice(attrs)[0] if attrs else Attr.LIFETIME
                attrs.insert(rng.randint(0, len(attrs)), (attr_type, rng.randbytes(rng.choice((0, 1, 4, 8, 20)))))
            elif roll < 0.9:  # an unknown attribute, comprehension-required or not
                attrs.append((rng.choice((0x0031, 0x7FFF, 0x8055, 0xC001, rng.randrange(65536))),
                              rng.randbytes(rng.randint(0, 12))))
            elif len(attrs) > 1:  # another order
                rng.shuffle(attrs)
        if rng.random() < 0.1:  # another method or class
            msg_type = rng.choice((0x0001, 0x0003, 0x0004, 0x0008, 0x0009, 0x0016, 0x0011, 0x000A, 0x0113,
                                   rng.randrange(0x4000)))
        attrs += [(Attr.USERNAME, self.creds.username.encode()), (Attr.REALM, self.creds.realm.encode()),
                  (Attr.NONCE, nonce.encode())]
        return sign(msg_type, rng.randbytes(12), attrs, self.creds.key, fingerprint=rng.random() < 0.5)


# --------------------------------------------------------------------------- the server's view


def reached(server: RunningServer) -> float:
    """Everything the server counted as handled: requests answered, packets dropped (for
    any reason, withheld challenges included), data relayed toward peers."""
    now = scrape_now(server)
    total = 0.0
    for (name, labels), value in now.samples.items():
        if name in ("turn_requests_total", "turn_dropped_packets_total", "turn_limit_refusals_total"):
            total += value
        elif name == "turn_relayed_packets_total" and dict(labels).get("direction") == "client_to_peer":
            total += value
    return total


def fetch_nonces(server: RunningServer, ips: tuple[str, ...], username: str) -> dict[str, str]:
    nonces = {}
    for ip in ips:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((ip, 0))
            sock.settimeout(STEP_TIMEOUT_S)
            msg = Message(Method.ALLOCATE, MessageClass.REQUEST).add(Attr.REQUESTED_TRANSPORT, 17)
            sock.sendto(encode_message(msg), server.address("udp"))
            reply = decode_message(sock.recvfrom(65536)[0])
            assert reply.get(Attr.ERROR_CODE)[0] == 401 and Attr.NONCE in reply, reply
            nonces[ip] = reply.get(Attr.NONCE)
    return nonces


def udp_binding(server: RunningServer, source_ip: str = "127.0.0.1") -> Message | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source_ip, 0))
        sock.settimeout(STEP_TIMEOUT_S)
        msg = Message(Method.BINDING, MessageClass.REQUEST)
        sock.sendto(encode_message(msg), server.address("udp"))
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                data = sock.recvfrom(65536)[0]
            except (socket.timeout, TimeoutError):
                return None
            reply = decode_message(data)
            if reply.transaction_id == msg.transaction_id:
                return reply
    return None


def stream_binding(server: RunningServer, transport: str) -> Message | None:
    raw = socket.create_connection(server.address("tls" if transport == "tls" else "tcp"), timeout=STEP_TIMEOUT_S)
    sock: socket.socket = client_tls_context().wrap_socket(raw, server_hostname="localhost") \
        if transport == "tls" else raw
    try:
        msg = Message(Method.BINDING, MessageClass.REQUEST)
        sock.sendall(encode_message(msg))
        data = b""
        while len(data) < 20 or len(data) < 20 + struct.unpack_from("!H", data, 2)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        reply = decode_message(data[:20 + struct.unpack_from("!H", data, 2)[0]])
        return reply if reply.transaction_id == msg.transaction_id else None
    finally:
        sock.close()


class ReferencePair:
    """Two allocations with channels to each other, made before any fuzzing."""

    def __init__(self, server: RunningServer) -> None:
        self.a = RawTurnClient(server.address("udp"), *server.credentials("reference-a"))
        self.b = RawTurnClient(server.address("udp"), *server.credentials("reference-b"))
        replies = [self.a.allocate(), self.b.allocate()]
        assert [code(r) for r in replies] == [200, 200], replies
        ra, rb = self.a.relayed(replies[0]), self.b.relayed(replies[1])
        assert code(self.a.bind(0x4000, rb)) == 200 and code(self.b.bind(0x4001, ra)) == 200

    def relays_both_ways(self) -> None:
        ways = ((self.a, self.b, 0x4000, 0x4001), (self.b, self.a, 0x4001, 0x4000))
        for sender, receiver, out_ch, in_ch in ways:
            payload = os.urandom(120)
            sender.send_raw(struct.pack("!HH", out_ch, len(payload)) + payload)
            deadline = time.monotonic() + STEP_TIMEOUT_S
            while True:
                got = receiver.recv(max(0.01, deadline - time.monotonic()))
                assert got is not None, "the reference allocation no longer relays"
                if got == struct.pack("!HH", in_ch, len(payload)) + payload:
                    break

    def refresh(self) -> None:
        for client in (self.a, self.b):
            assert code(client.request(Method.REFRESH, [(Attr.LIFETIME, 600)])) == 200

    def close(self) -> None:
        self.a.close()
        self.b.close()


# --------------------------------------------------------------------------- the senders


def fuzz_udp(server: RunningServer, mutator: Mutator, count: int) -> dict[str, int]:
    socks = []
    for ip in FUZZ_IPS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ip, 0))
        sock.setblocking(False)
        socks.append(sock)
    stats = {"sent": 0, "answers": 0, "syncs_missed": 0}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            sock = socks[i % len(socks)]
            try:
                sock.sendto(mutator.one(sock.getsockname()[0]), server.address("udp"))
                stats["sent"] += 1
            except OSError:
                pass  # e.g. a datagram too long for the socket
            if i % SYNC_EVERY == SYNC_EVERY - 1:
                for s in socks:
                    while True:
                        try:
                            s.recv(65536)
                            stats["answers"] += 1
                        except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                            break
                # The listener is one socket, read in order: once a Binding sent now is
                # answered, everything sent before it was handled.
                if udp_binding(server, "127.0.0.1") is None:
                    stats["syncs_missed"] += 1
    finally:
        for sock in socks:
            sock.close()
    return stats


def fuzz_stream(server: RunningServer, mutator: Mutator, count: int, transport: str) -> dict[str, int]:
    """Connections of FRAMES_PER_CONNECTION frames each, half-closed after the last one; the
    server closing the connection (after reading all of it) paces the next one."""
    stats = {"sent": 0, "connections": 0, "closed_early": 0, "plain_on_tls": 0, "no_close": 0}
    context = client_tls_context()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    rng = mutator.rng
    sent = 0
    while sent < count and time.monotonic() < deadline:
        ip = FUZZ_IPS[stats["connections"] % len(FUZZ_IPS)]
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.settimeout(STEP_TIMEOUT_S)
        raw.bind((ip, 0))
        raw.connect(server.address(transport))
        stats["connections"] += 1
        sock: socket.socket = raw
        if transport == "tls":
            if rng.random() < 0.1:
                stats["plain_on_tls"] += 1  # plain TURN on the TLS port is served too
            else:
                try:
                    sock = context.wrap_socket(raw, server_hostname="localhost")
                except (ssl.SSLError, OSError):
                    raw.close()
                    continue
        size = min(FRAMES_PER_CONNECTION, count - sent)
        # Every frame mutated, all but the last one cut to size again so that the stream stays
        # in step; the last one is sent as mutated, framing errors and all.
        frames = [reframe(mutator.one(ip), rng) for _ in range(size - 1)] + [mutator.one(ip)]
        sent += len(frames)
        try:
            for frame in frames:
                sock.sendall(frame)
                stats["sent"] += 1
            sock.shutdown(socket.SHUT_WR)
        except (OSError, ssl.SSLError):
            stats["closed_early"] += 1  # a framing error: the server closed first
        try:
            sock.settimeout(STEP_TIMEOUT_S)
            while sock.recv(65536):
                pass
        except (socket.timeout, TimeoutError):
            stats["no_close"] += 1
        except (OSError, ssl.SSLError):
            pass
        finally:
            sock.close()
    return stats


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[bytes]]:
    captures = load_captures()
    clients = {c.name.split("-")[0] for c in captures}
    assert {"aioice", "uclient", "chromium"} <= clients, clients
    udp = [m for c in captures for m in c.messages]  # stream frames make fine datagrams too
    stream = [pad_for_stream(m) for m in udp]
    return {"udp": udp, "tcp": stream, "tls": stream}


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_mutated_captures_leave_the_server_serving(server_factory: Callable[..., RunningServer],
                                                  corpora: dict[str, list[bytes]], transport: str) -> None:
    server = server_factory(**fuzz_options())
    reference = ReferencePair(server)
    try:
        reference.relays_both_ways()
        username, password = server.credentials("fuzzer", ttl_s=7200)
        realm = server.options["realm"]
        creds = Credentials(username, realm, long_term_key(username, realm, password),
                            fetch_nonces(server, FUZZ_IPS, username))
        seed = SEED + {"udp": 0, "tcp": 1, "tls": 2}[transport]
        mutator = Mutator(random.Random(seed), corpora[transport], creds)
        before = reached(server)
        started = time.monotonic()
        if transport == "udp":
            stats = fuzz_udp(server, mutator, COUNT)
        else:
            stats = fuzz_stream(server, mutator, COUNT, transport)
        elapsed = time.monotonic() - started
        handled = reached(server) - before
        summary = (f"seed={seed} {transport}: {stats} in {elapsed:.1f} s, server counted {handled:.0f}; "
                   f"ops={mutator.counts}")
        print(summary)

        assert server.alive(), summary
        assert stats["sent"] >= COUNT * (0.99 if transport == "udp" else 0.5), summary
        # The fuzz reached the server and was looked at, not lost on the way.
        if transport == "udp":
            assert stats["syncs_missed"] == 0, summary
            assert handled >= 0.9 * stats["sent"], summary
        else:
            assert stats["no_close"] == 0, summary
            assert handled >= 0.8 * stats["sent"], summary
        binding = udp_binding(server)
        assert binding is not None and code(binding) == 200, summary
        for stream in ("tcp", "tls"):
            reply = stream_binding(server, stream)
            assert reply is not None and code(reply) == 200, (stream, summary)
        reference.relays_both_ways()
        reference.refresh()
        now = scrape_now(server)
        assert now.get("turn_dropped_packets_total", reason="internal_error") == 0, summary
    finally:
        reference.close()
    assert server.stop() == 0
    log = server.log_text()
    assert "Traceback" not in log, log[-5000:]
