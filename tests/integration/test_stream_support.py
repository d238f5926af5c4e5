"""Helpers for the TCP/TLS tests (no tests here): a small synchronous TURN client on a stream
socket that sends exact bytes, and the server options that turn the stream listeners on."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from turnserver.auth import long_term_key
from turnserver.client import client_tls_context as turn_client_tls_context
from turnserver.stun import (
    Attr,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    decode_message,
    encode_channel_data,
    encode_message,
)

from .server import RunningServer

TIMEOUT_S = 3.0
PEER_IP = "127.0.0.2"  # loopback, but not the relay address: needs allowed_peers

# TCP and TLS on 127.0.0.1 with kernel-chosen ports, and a peer address the policy lets through.
STREAM_OPTIONS: dict[str, Any] = {
    "listen_tcp": ["127.0.0.1:0"],
    "listen_tls": ["127.0.0.1:0"],
    "allowed_peers": [f"{PEER_IP}/32"],
}


def client_tls_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    """turnserver.client's context without verification (the server's certificate is the
    self-signed start-up one: tests check the channel, not the identity), offering ``alpn``
    instead of its "stun.turn"; by default no ALPN at all, as browsers do."""
    ctx = turn_client_tls_context(verify=False)
    ctx.set_alpn_protocols(alpn or [])
    return ctx


def connect(server: RunningServer, transport: str, *, rcvbuf: int | None = None,
            timeout_s: float = TIMEOUT_S) -> socket.socket:
    """A connected socket to the server's ``transport`` listener ("tcp", "tls", or
    "tcp-on-tls": plain bytes to the TLS port)."""
    port = server.port("tls" if transport.endswith("tls") else "tcp")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout_s)
    sock.connect(("127.0.0.1", port))
    if transport == "tls":
        sock = client_tls_context().wrap_socket(sock, server_hostname="localhost")
    return sock


class StreamTurnClient:
    """TURN over one TCP or TLS connection, synchronous, for tests that need exact bytes."""

    def __init__(self, server: RunningServer, transport: str = "tcp", *, user: str = "alice",
                 rcvbuf: int | None = None) -> None:
        self.username, self.password = server.credentials(user)
        self.realm = server.options["realm"]
        self.nonce: str | None = None
        self.sock = connect(server, transport, rcvbuf=rcvbuf)
        self.framer = StreamFramer(max_channel=0x7FFF)
        self.frames: list[bytes] = []

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self, timeout_s: float = TIMEOUT_S) -> bytes | None:
        """The next whole frame (ChannelData without its padding), or None on timeout/close."""
        deadline = time.monotonic() + timeout_s
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            if not data:
                return None
            self.frames.extend(self.framer.feed(data))
        return self.frames.pop(0)

    def recv_exact(self, size: int, timeout_s: float = TIMEOUT_S) -> bytes:
        """Raw bytes off the stream, bypassing the framer (to see padding)."""
        out = b""
        deadline = time.monotonic() + timeout_s
        while len(out) < size and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(size - len(out))
            if not chunk:
                break
            out += chunk
        return out

    def transact_raw(self, data: bytes, transaction_id: bytes, timeout_s: float = TIMEOUT_S) -> Message | None:
        self.send_raw(data)
        return self.wait_response(transaction_id, timeout_s)

    def wait_response(self, transaction_id: bytes, timeout_s: float = TIMEOUT_S) -> Message | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            frame = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if frame is None:
                return None
            if frame[0] < 0x40:
                msg = decode_message(frame)
                if msg.transaction_id == transaction_id and msg.msg_class in (MessageClass.SUCCESS, MessageClass.ERROR):
                    return msg
        return None

    def encode_request(self, method: int, attrs: list[tuple[int, Any]] | None = None) -> tuple[bytes, bytes]:
        msg = Message(method, MessageClass.REQUEST, attributes=list(attrs or []))
        if self.nonce is not None:
            msg.add(Attr.USERNAME, self.username).add(Attr.REALM, self.realm).add(Attr.NONCE, self.nonce)
            return encode_message(msg, key=self.key), msg.transaction_id
        return encode_message(msg), msg.transaction_id

    def request(self, method: int, attrs: list[tuple[int, Any]] | None = None) -> Message:
        reply: Message | None = None
        for _ in range(3):
            data, tid = self.encode_request(method, attrs)
            reply = self.transact_raw(data, tid)
            assert reply is not None, f"no answer to {Method(method).name}"
            if reply.msg_class == MessageClass.ERROR and reply.get(Attr.ERROR_CODE)[0] in (401, 438) \
                    and Attr.NONCE in reply:
                self.nonce = reply.get(Attr.NONCE)
                self.realm = reply.get(Attr.REALM) or self.realm
                continue
            return reply
        assert reply is not None
        return reply

    def allocate(self, **extra: Any) -> tuple[str, int]:
        attrs = [(Attr.REQUESTED_TRANSPORT, 17)] + [(Attr[k], v) for k, v in extra.items()]
        reply = self.request(Method.ALLOCATE, attrs)
        assert reply.msg_class == MessageClass.SUCCESS, reply
        return reply.get(Attr.XOR_RELAYED_ADDRESS)

    def bind(self, number: int, peer: tuple[str, int]) -> None:
        reply = self.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)])
        assert reply.msg_class == MessageClass.SUCCESS, reply

    def refresh(self, lifetime_s: int) -> Message:
        return self.request(Method.REFRESH, [(Attr.LIFETIME, lifetime_s)])

    def channel_data(self, number: int, data: bytes) -> None:
        self.send_raw(encode_channel_data(number, data, pad=True))

    def binding_bytes(self) -> tuple[bytes, bytes]:
        msg = Message(Method.BINDING, MessageClass.REQUEST)
        return encode_message(msg, fingerprint=True), msg.transaction_id

    def closed_by_server(self, timeout_s: float = TIMEOUT_S) -> bool:
        """True when the server closes (EOF or reset) within the timeout; data read meanwhile
        is discarded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except (socket.timeout, TimeoutError):
                return False
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return True
        return False


def is_closed(sock: socket.socket, timeout_s: float = TIMEOUT_S) -> bool:
    """Whether the server closed ``sock`` within the timeout (anything read is discarded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except (socket.timeout, TimeoutError):
            return False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
    return False


def udp_peer(ip: str = PEER_IP) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.settimeout(TIMEOUT_S)
    return sock


def stream_summary(server: RunningServer) -> dict[str, Any]:
    """The counters the stream layer logs when the server stops (JSON log format)."""
    for line in server.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if str(entry.get("msg", entry.get("message", ""))).startswith("stream connections"):
            return entry
    raise AssertionError(f"no stream summary in the log:\n{server.log_text()[-3000:]}")


def usage_records(server: RunningServer) -> list[dict[str, Any]]:
    records = []
    for line in server.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "turnd.usage":
            records.append(entry)
    return records


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


__all__ = [
    "PEER_IP", "STREAM_OPTIONS", "StreamTurnClient", "TIMEOUT_S", "client_tls_context",
    "connect", "is_closed", "stream_summary", "udp_peer", "usage_records", "vm_rss_kib",
]
